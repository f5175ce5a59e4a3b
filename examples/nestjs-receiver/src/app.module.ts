import { Module } from '@nestjs/common';
import { ProfilesService } from './profiles.service';
import { UsersController } from './users.controller';
import { ApiKeyGuard, WebhookSignatureGuard } from './new-user-webhook.guard';

@Module({
  controllers: [UsersController],
  providers: [ProfilesService, ApiKeyGuard, WebhookSignatureGuard],
})
export class AppModule {}
