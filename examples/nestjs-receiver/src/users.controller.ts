import { BadRequestException, Body, Controller, Get, Headers, HttpCode, Post, UseGuards } from '@nestjs/common';
import { ApiKeyGuard, WebhookSignatureGuard } from './new-user-webhook.guard';
import { Profile, ProfilesService } from './profiles.service';

/** The body pg_new_user_hook sends with payload_format = minimal. */
interface NewUserDto {
  id: string;
  email: string | null;
}

@Controller()
export class UsersController {
  constructor(private readonly profiles: ProfilesService) {}

  @Post('users')
  @HttpCode(201)
  @UseGuards(ApiKeyGuard, WebhookSignatureGuard)
  create(@Body() body: NewUserDto, @Headers('webhook-id') eventId: string): { created: boolean } {
    if (typeof body?.id !== 'string' || !(typeof body.email === 'string' || body.email === null)) {
      throw new BadRequestException('expected {"id": string, "email": string | null}');
    }
    // 2xx either way: a duplicate is a success for the sender, which must stop retrying.
    return { created: this.profiles.createFromEvent(eventId ?? '', body.id, body.email) };
  }

  /** For the example's end-to-end test (and a human with curl): the profiles created. */
  @Get('profiles')
  @UseGuards(ApiKeyGuard)
  list(): Profile[] {
    return this.profiles.all();
  }
}
